"""pkisvc.memo: the bounded map behind the remembered certificate checks and Vault's cache."""
from pkisvc.memo import Memo


def test_the_least_recently_used_entry_goes_first():
    memo: Memo[str, int] = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a use: b is now the oldest
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
    memo.put("a", 4)  # replacing is a use too
    memo.put("d", 5)
    assert (memo.get("a"), memo.get("c"), memo.get("d")) == (4, None, 5)
