"""Policies: the learned ATP policy and fixed-rule baselines, one file each."""

from atp.hookspecs import hookimpl
from atp.policies.atp import AtpPolicy
from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fastv import FastVPolicy
from atp.policies.fixed import FixedPolicy, top_k_mask
from atp.policies.keep_all import KeepAllPolicy
from atp.policies.manual import ManualPolicy
from atp.policies.pdrop import PDropPolicy
from atp.policies.pool import PoolPolicy
from atp.policies.random import RandomPolicy
from atp.policies.spatial import SpatialPolicy

__all__ = [
    "PoolPolicy",
    "FastVPolicy",
    "PDropPolicy",
    "RandomPolicy",
    "SpatialPolicy",
    "AtpPolicy",
    "Decision",
    "FixedPolicy",
    "KeepAllPolicy",
    "ManualPolicy",
    "Policy",
    "PolicyContext",
    "PolicyInput",
    "top_k_mask",
]


@hookimpl
def atp_register_policies(register):
    register("atp", AtpPolicy)
    register("keep_all", KeepAllPolicy)
    register("fixed", FixedPolicy)
    register("manual", ManualPolicy)
    register("fastv", FastVPolicy)
    register("pdrop", PDropPolicy)
    register("spatial", SpatialPolicy)
    register("random", RandomPolicy)
    register("pool", PoolPolicy)
