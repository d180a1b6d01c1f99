"""RLKV attention backends: ``cpu`` (over CPU_ATTN) and ``cuda`` (CUSTOM / RLKV)."""
