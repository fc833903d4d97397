"""Our modules log with the standard logger; PREFECT_LOGGING_EXTRA_LOGGERS (scripts/env.sh) sends
those lines to the Prefect UI, but only at the level the logger lets through, and Python's default
is WARNING. Every flow calls this first, so a deployment run shows the device plan, resuming and
progress lines in the UI, not only a run started from the CLI."""

import logging

OUR_LOGGERS = ("doctune", "tasks", "flows")


def our_loggers_at_info() -> None:
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:  # DEBUG stays DEBUG
            logger.setLevel(logging.INFO)
