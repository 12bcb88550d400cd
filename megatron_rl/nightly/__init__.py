"""Nightly scale suites: run a list of recipes for N steps, check their metrics, write a report.

    python -m megatron_rl.launch nightly --suite NAME [--dry-run] [--only PATTERN] [--baseline DIR]

Pieces: `suite` (YAML suite files in nightly/suites/), `assertions` (the metric assertion language),
`local` / `slurm` (how one entry runs), `runner` (launch, poll, time out, evaluate), `report` /
`html_report` / `plots` (Markdown, JSON, JUnit, HTML), `baseline` (regressions against a stored report).
"""
