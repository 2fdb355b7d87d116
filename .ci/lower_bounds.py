"""Print pip constraints that pin every direct dependency of pyproject.toml (and the extras named on
the command line) to its declared lower bound: the environment `make test-oldest` tests.

    python .ci/lower_bounds.py [EXTRA ...] > constraints.txt
"""

import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    lower = re.search(r">=\s*([^,;\s]+)", requirement)
    if lower is None:
        sys.exit(f"pyproject.toml: {requirement!r} has no lower bound (>=); every dependency needs one")
    print(f"{name}=={lower.group(1)}")
