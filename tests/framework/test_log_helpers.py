from __future__ import annotations

import logging

import pytest

from framework.log_helpers import make_timing_logger


def test_timing_logger_logs_the_message_with_its_duration(caplog):
    log_time = make_timing_logger(
        logging.getLogger("timing"), precision=2, level=logging.INFO
    )

    with caplog.at_level(logging.INFO, logger="timing"), log_time("loaded %s", "x"):
        pass

    (record,) = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith("loaded x in 0.")
    assert message.endswith("s") and len(message.split(" in ")[1]) == len("0.00s")


def test_timing_logger_logs_even_when_the_block_raises(caplog):
    log_time = make_timing_logger(logging.getLogger("timing"))

    with caplog.at_level(logging.DEBUG, logger="timing"):
        with pytest.raises(KeyError), log_time("lookup"):
            raise KeyError("k")

    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["lookup"]
