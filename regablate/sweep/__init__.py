"""The register-count grid: grid files, config resolution, run state, and the launchers that run it."""
