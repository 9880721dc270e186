"""GitLab's runner API spoken directly (no gitlab-runner): jobs, traces, artifacts.

``payload`` (the job), ``trace`` (masking, sections, offsets) and ``script``
(the guest shell script) are pure; ``client`` sends single requests over
aiohttp and ``session`` runs the loops (polling, trace streaming, the final
update) around it. The custom executor for gitlab-runner is
``runner.forge.gitlab_executor``.
"""
