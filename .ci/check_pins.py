"""Fail unless every `name==version` pin of a constraints file is what is installed
(pip applies a constraint only to what it installs, so a pin can silently not take)."""
import importlib.metadata
import sys


def main(path: str) -> int:
    wrong = []
    for line in open(path, encoding="utf-8"):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name, _, want = spec.partition("==")
        try:
            have = importlib.metadata.version(name.strip())
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have != want.strip():
            wrong.append(f"{name.strip()}: pinned {want.strip()}, installed {have}")
    for w in wrong:
        print(f"{path}: {w}", file=sys.stderr)
    if not wrong:
        print(f"{path}: all pins installed")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
