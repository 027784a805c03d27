"""tandem.policies — what acts: generic policies (``flow``), the SDE kernel, and one set of files per generator
family, registered in ``families`` (GLM-Image: ``glm_image``, ``glm_image_family``, ``ar*``, ``tiny``)."""
