"""Prints, as JSON, every container of the workloads (StatefulSet,
DaemonSet, Deployment) in the given Kubernetes manifests: its workload,
command, args and the names of its environment variables. The deploy test
runs those command lines against the real binaries."""
import json
import sys

import yaml

out = []
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") not in ("StatefulSet", "DaemonSet", "Deployment"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out.append({
                    "workload": f'{doc["kind"].lower()}/{doc["metadata"]["name"]}',
                    "command": c.get("command", []),
                    "args": c.get("args", []),
                    "env": [e["name"] for e in c.get("env", [])],
                })
print(json.dumps(out))
