"""tandem policies — what acts. One adapter file per generator family; one policy per stage."""

from tandem.policies.glm_image import GlmImageAdapter


def _flow_policy(pipe, cfg):
    from tandem.policies.flow import FlowPolicy

    return FlowPolicy(pipe, cfg)


def _ar_policy(pipe, cfg):
    from tandem.policies.ar import ARPolicy

    return ARPolicy(pipe, GlmImageAdapter(pipe), cfg)


# stage name -> constructor(pipe, cfg); the trainer looks policies up here and nowhere else.
POLICIES = {"decoder": _flow_policy, "ar": _ar_policy}
