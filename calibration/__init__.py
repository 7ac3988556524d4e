"""edgecore.calibration"""
