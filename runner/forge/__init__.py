"""Forges: where jobs come from (GitHub Actions, GitLab, a local job file)."""
