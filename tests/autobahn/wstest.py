# Runs Autobahn|Testsuite's wstest from a `pip --target` directory (argv[1]); site.addsitedir
# processes the namespace-package .pth files that a plain PYTHONPATH would skip.
import site
import sys

site.addsitedir(sys.argv.pop(1))
from autobahntestsuite.wstest import run  # noqa: E402

run()
