"""Regenerate the vendored CRD schemas: `python extract.py CRD.yaml [...]` writes <kind>-<version>.json here.

Each file is the `openAPIV3Schema` of one served version of a published CustomResourceDefinition, with the
`description` texts dropped to keep the files small. Sources are listed in SOURCES.md.
"""

import json
import sys
from pathlib import Path

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(paths):
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = strip(version["schema"]["openAPIV3Schema"])
                schema["x-source"] = {"group": group, "kind": kind, "version": version["name"]}
                out = Path(__file__).with_name(f"{kind.lower()}-{version['name']}.json")
                out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                print(out.name, out.stat().st_size)


if __name__ == "__main__":
    main(sys.argv[1:])
