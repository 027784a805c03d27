"""tandem policies — what acts. One adapter file per generator family; one policy per stage."""

from policies.flow import FlowPolicy


def _ar_policy(pipe, cfg):
    from policies.ar import ARPolicy

    return ARPolicy(pipe, cfg)


# stage name -> constructor(pipe, cfg); the trainer looks policies up here and nowhere else.
POLICIES = {"decoder": FlowPolicy, "ar": _ar_policy}
