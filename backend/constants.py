"""Numbers shared by every part of the backend (metres, +Y up, face toward +Z)."""

N_REGIONS = 39
N_EXPRESSIONS = 53
ID_DIM = 256
REGION_DIM = 32

# Canonical extraction box: covers the ICT mean head (x ±0.124, y -0.193..0.145, z -0.092..0.131 m)
# with room for ±3 sigma identities and open-jaw expressions.
BBOX_MIN = (-0.16, -0.22, -0.13)
BBOX_MAX = (0.16, 0.18, 0.17)

MAX_RESOLUTION = 1024
MAX_POINTS = 5_000_000
