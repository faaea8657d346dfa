"""Prints, as JSON, every service of a compose file with its entrypoint
(default: the image's, talon-coordinator), command and environment; the
deploy test runs those command lines as plain processes."""
import json
import sys

import yaml

with open(sys.argv[1]) as f:
    doc = yaml.safe_load(f)
out = {}
for name, s in doc["services"].items():
    out[name] = {
        "entrypoint": s.get("entrypoint", ["/usr/local/bin/talon-coordinator"]),
        "command": s.get("command", []),
        "environment": s.get("environment", {}),
    }
print(json.dumps(out))
