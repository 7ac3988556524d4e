"""edgecore — PatchCore anomaly detection from the workstation to the smart camera.

Importing this package must stay cheap and torch-free: the camera installs the
same distribution without torch and only uses ``edgecore.runtime``.
"""
__version__ = "0.1.0"
