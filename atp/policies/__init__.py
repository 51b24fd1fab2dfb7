"""Policies: the learned ATP policy and fixed-rule baselines, one file each."""

from atp.hookspecs import hookimpl
from atp.policies.atp import AtpPolicy
from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fixed import FixedPolicy, top_k_mask
from atp.policies.keep_all import KeepAllPolicy
from atp.policies.manual import ManualPolicy

__all__ = [
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
