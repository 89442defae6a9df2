"""Training data from ICT-FaceKit: converter (ict), region atlas (atlas), sampler, held-out split (splits),
NPHM-style metrics (metrics) and mesh operations (topology: numpy; geometry: torch)."""
