"""Amortized posteriors q(z|x): the registry, Gaussian guides and normalizing-flow guides."""

from __future__ import annotations

from .base import GUIDES, MIN_SCALE, AmortizedGuide, FlowGuide, make_guide, register_guide
from .flows import IAFGuide, PlanarGuide, RadialGuide, SplineGuide
from .gaussian import DiagonalNormalGuide, FullCovarianceGuide
from .lowrank import LowRankNormalGuide
from .sylvester import ConditionedHouseholderSylvester, HouseholderSylvesterGuide

__all__ = [
    "GUIDES",
    "MIN_SCALE",
    "AmortizedGuide",
    "ConditionedHouseholderSylvester",
    "DiagonalNormalGuide",
    "FlowGuide",
    "FullCovarianceGuide",
    "HouseholderSylvesterGuide",
    "IAFGuide",
    "LowRankNormalGuide",
    "PlanarGuide",
    "RadialGuide",
    "SplineGuide",
    "make_guide",
    "register_guide",
]
