"""Real distributed pieces on torch.distributed: message exchange over collectives (``exchange``)
and the parameter server over point-to-point messages (``server``)."""
