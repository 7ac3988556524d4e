"""Fit beyond one machine on Ray: sharded feature extraction, composable coreset, parallel fits.

``pip install 'edgecore[cluster]'`` brings Ray; nothing here is imported by the
single-machine fit or by the camera runtime.
"""
from edgecore.distributed.composable import ComposableResult, composable_kcenter
from edgecore.distributed.fit import fit_distributed

__all__ = ["ComposableResult", "composable_kcenter", "fit_distributed"]
