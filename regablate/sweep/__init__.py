"""The register-count grid: grid files, the sweep that runs them, and the Figure 8 report."""
