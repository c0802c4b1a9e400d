"""``framework.utils.retry``: nameko's ``@retry`` decorator."""

from __future__ import annotations

from unittest.mock import Mock, patch

import pytest

from framework.utils.retry import retry


@pytest.fixture
def sleep() -> Mock:
    with patch("framework.utils.retry.sleep") as patched:
        yield patched


def test_bare_decorator_retries_three_times_then_raises(sleep: Mock) -> None:
    calls = Mock(side_effect=ValueError("boom"))

    @retry
    def fn() -> None:
        calls()

    with pytest.raises(ValueError):
        fn()
    assert calls.call_count == 4
    assert [c.args[0] for c in sleep.call_args_list] == [1, 1, 1]


def test_other_exceptions_are_not_retried(sleep: Mock) -> None:
    calls = Mock(side_effect=KeyError("x"))
    fn = retry(for_exceptions=ValueError)(calls)
    with pytest.raises(KeyError):
        fn()
    assert calls.call_count == 1
    sleep.assert_not_called()


def test_backoff_is_capped_and_result_returned(sleep: Mock) -> None:
    calls = Mock(side_effect=[ValueError(), ValueError(), ValueError(), "done"])

    @retry(max_attempts=None, delay=1, backoff=3, max_delay=5)
    def fn(value: int) -> str:
        return calls(value)

    assert fn(7) == "done"
    calls.assert_called_with(7)
    assert [c.args[0] for c in sleep.call_args_list] == [3, 5, 5]
    assert fn.__name__ == "fn"
