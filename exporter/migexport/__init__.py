"""migexport: make PostgreSQL production migrations observable and safe."""

__version__ = "0.1.0"

# Where rules/runbooks/ is published; every alert links to <this>/<AlertName>.md (`migexport rules`
# --runbook-base-url). Here rather than in rulegen so the CLI can show it without loading the rule modules.
DEFAULT_RUNBOOK_BASE = "https://github.com/migexport/migexport/blob/main/rules/runbooks"
