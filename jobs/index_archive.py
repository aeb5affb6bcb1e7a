"""Ray Job entrypoint: index an archive on the cluster this job runs on.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \
        --submission-id nightly-$(date -u +%F) -- \
        python -m jobs.index_archive s3://podcasts/ --out s3://podcasts-index/ --model salmonn-13b

Takes the same options as `salmonn-pipeline run`; connects to the job's cluster (``--address
auto``) unless an address is given. Exit code 0 when the run completed (error rows included),
non-zero when the run itself could not complete, so `ray job status` says SUCCEEDED or FAILED.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipelines import cli


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--address" or a.startswith("--address=") for a in argv):
        argv += ["--address", "auto"]
    return cli.main(["run", *argv])


if __name__ == "__main__":
    sys.exit(main())
