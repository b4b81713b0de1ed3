"""`edc-ray benchmark` as a script, for `ray job submit -- python jobs/benchmark.py ...`; the code is
edc_ray/commands/benchmark.py.

    python jobs/benchmark.py --help
"""
import sys

from edc_ray.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
