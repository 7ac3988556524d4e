"""edgecore.export"""
