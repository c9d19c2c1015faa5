"""PrefixCache: matching, splitting, locking, LRU eviction, flush, duplicate inserts, draft-KV
bookkeeping, and the SlotAllocator reclaimer hook.  Real SlotAllocator throughout, so any double
free or stray slot raises inside the allocator."""

from __future__ import annotations

import random

import pytest

from faser_sgl.executor.kv_cache import SlotAllocator
from faser_sgl.managers.prefix_cache import PrefixCache, PrefixMatch


def make(num_slots: int = 64) -> tuple[SlotAllocator, PrefixCache]:
    alloc = SlotAllocator(num_slots)
    return alloc, PrefixCache(alloc)


def run(cache: PrefixCache, tokens: list[int], draft_len: int | None = None, limit: int | None = None):
    """A whole request: match, allocate the rest, release with everything computed.
    Returns (match, slots) as they were before release."""
    m = cache.match(tokens, len(tokens) if limit is None else limit)
    own = cache.allocator.alloc(len(tokens) - len(m.slots))
    assert own is not None
    slots = m.slots + own
    cache.release(m.node, tokens, slots, len(tokens) if draft_len is None else draft_len)
    return m, slots


def lookup(cache: PrefixCache, tokens: list[int], limit: int | None = None) -> PrefixMatch:
    """match() and release() at once, computing nothing: what is cached for tokens (this counts
    as a use for LRU)."""
    m = cache.match(tokens, len(tokens) if limit is None else limit)
    cache.release(m.node, tokens, m.slots, 0)
    return m


def paths(cache: PrefixCache) -> list[tuple]:
    """Full token path of every node, sorted (does not touch LRU)."""
    return sorted(tuple(before + n.key) for n, before in nodes(cache))


def nodes(cache: PrefixCache):
    """(node, path tokens before it) for every node but the root, by an independent walk."""
    out, stack = [], [(c, []) for c in cache._root.children.values()]
    while stack:
        node, before = stack.pop()
        out.append((node, before))
        stack.extend((c, before + node.key) for c in node.children.values())
    return out


def check_tree(cache: PrefixCache, handles=()) -> None:
    """Structural invariants, recomputed from scratch."""
    all_nodes = nodes(cache)
    seen_slots = []
    for node, _ in all_nodes:
        assert node.key and len(node.key) == len(node.slots)
        assert node.parent.children[node.key[0]] is node
        assert 0 <= node.draft_len <= len(node.key)
        assert node.lock_ref >= 0
        seen_slots += node.slots
    assert len(seen_slots) == len(set(seen_slots)) == cache.cached_size
    assert cache.evictable_size == sum(len(n.key) for n, _ in all_nodes if n.lock_ref == 0)
    # lock_ref == number of live handles at or below the node.
    expected = {id(n): 0 for n, _ in all_nodes}
    for h in handles:
        while h is not cache._root:
            expected[id(h)] += 1
            h = h.parent
    assert all(n.lock_ref == expected[id(n)] for n, _ in all_nodes)


# ---------------------------------------------------------------- matching and splitting

def test_empty_cache_and_nonpositive_limit():
    alloc, cache = make(8)
    assert alloc.reclaimer is cache
    m = cache.match([1, 2, 3], 3)
    assert isinstance(m, PrefixMatch) and m.slots == [] and m.draft_len == 0
    cache.release(m.node, [1, 2, 3], [], 0)  # nothing computed: inserting nothing is fine
    run(cache, [1, 2, 3])
    for limit in (0, -5):
        m = cache.match([1, 2, 3], limit)
        assert m.slots == [] and m.draft_len == 0
        cache.release(m.node, [1, 2, 3], [], 0)
    assert cache.cached_size == 3 and alloc.num_free == 5
    check_tree(cache)


def test_match_full_partial_and_limit():
    alloc, cache = make(16)
    _, slots = run(cache, [1, 2, 3, 4, 5])
    assert cache.cached_size == 5 and cache.evictable_size == 5 and alloc.num_free == 11

    m = cache.match([1, 2, 3, 4, 5, 6, 7], 7)  # longer query: whole cached prefix
    assert m.slots == slots
    cache.release(m.node, [1, 2, 3, 4, 5, 6, 7], m.slots, 0)  # released without computing more

    m = cache.match([1, 2, 3, 9], 4)  # diverges inside the node: split at 3
    assert m.slots == slots[:3]
    check_tree(cache, [m.node])
    assert [n.key for n, _ in nodes(cache)] == [[1, 2, 3], [4, 5]]
    assert cache.evictable_size == 2  # only the lower part is unlocked
    cache.release(m.node, [1, 2, 3, 9], m.slots, 0)

    m = cache.match([1, 2, 3, 4, 5], 2)  # limit cuts the query
    assert m.slots == slots[:2]
    cache.release(m.node, [1, 2, 3, 4, 5], m.slots, 0)
    assert lookup(cache, [7, 1, 2]).slots == []
    assert cache.cached_size == 5 and alloc.num_free == 11
    check_tree(cache)


def test_branching_prefixes_share_slots():
    alloc, cache = make(32)
    _, a = run(cache, [1, 2, 3, 4])
    mb, b = run(cache, [1, 2, 7, 8, 9])
    assert mb.slots == a[:2] and b[:2] == a[:2]
    assert cache.cached_size == 4 + 3 and alloc.num_free == 32 - 7
    assert lookup(cache, [1, 2, 3, 4]).slots == a
    assert lookup(cache, [1, 2, 7, 8, 9]).slots == b
    assert paths(cache) == [(1, 2), (1, 2, 3, 4), (1, 2, 7, 8, 9)]
    check_tree(cache)


def test_release_of_shorter_sequence_than_cached_does_not_split_or_free():
    alloc, cache = make(16)
    _, slots = run(cache, [1, 2, 3, 4, 5])
    m = cache.match([1, 2, 3, 4, 5], 5)
    cache.release(m.node, [1, 2, 3], m.slots[:3], 3)  # e.g. retracted down to 3 tokens
    assert [n.key for n, _ in nodes(cache)] == [[1, 2, 3, 4, 5]]
    assert cache.cached_size == 5 and cache.evictable_size == 5 and alloc.num_free == 11
    check_tree(cache)


def test_release_rejects_more_slots_than_tokens_and_double_release():
    alloc, cache = make(8)
    run(cache, [1, 2, 3])
    m = cache.match([1, 2, 3], 3)
    with pytest.raises(ValueError):
        cache.release(m.node, [1, 2], m.slots, 0)
    cache.release(m.node, [1, 2, 3], m.slots, 0)
    with pytest.raises(RuntimeError):
        cache.release(m.node, [1, 2, 3], m.slots, 0)
    check_tree(cache)


# ---------------------------------------------------------------- duplicates

def test_duplicate_insert_frees_the_duplicate_slots():
    alloc, cache = make(16)
    tokens = [5, 6, 7, 8]
    # Two requests miss the cache at the same time and both compute the same text.
    m1, m2 = cache.match(tokens, 4), cache.match(tokens, 4)
    s1, s2 = alloc.alloc(4), alloc.alloc(4)
    assert alloc.num_free == 8
    cache.release(m1.node, tokens, s1, 4)
    cache.release(m2.node, tokens, s2, 4)
    assert alloc.num_free == 12 and cache.cached_size == 4
    assert lookup(cache, tokens).slots == s1
    for s in s2:  # really back in the free list (a second free would raise)
        assert not alloc._in_use[s]


def test_partial_duplicate_frees_only_the_overlap():
    alloc, cache = make(32)
    _, first = run(cache, [1, 2, 3])
    # This request matched [1] only (limit), then computed [2, 3, 4, 5] itself meanwhile.
    m = cache.match([1, 2, 3, 4, 5], 1)
    own = alloc.alloc(4)
    cache.release(m.node, [1, 2, 3, 4, 5], m.slots + own, 5)
    assert alloc.num_free == 32 - 5 and cache.cached_size == 5
    assert lookup(cache, [1, 2, 3, 4, 5]).slots == first + own[2:]
    check_tree(cache)


# ---------------------------------------------------------------- locking and eviction

def test_locked_prefix_survives_eviction_and_evictable_is_exact():
    alloc, cache = make(16)
    _, a = run(cache, [1, 2, 3, 4])
    _, b = run(cache, [9, 9])
    m = cache.match([1, 2, 3], 3)  # split, lock [1, 2, 3]
    assert cache.evictable_size == 1 + 2
    assert cache.evict(100) == 3
    assert cache.cached_size == 3 and cache.evictable_size == 0
    assert cache.evict(1) == 0
    m2 = cache.match([1, 2, 3], 3)
    assert m2.slots == a[:3] and m2.node is m.node  # locked a second time
    check_tree(cache, [m.node, m.node])
    cache.release(m.node, [1, 2, 3], m.slots, 0)
    assert cache.evictable_size == 0  # still held by the second match
    cache.release(m.node, [1, 2, 3], m.slots, 0)
    assert cache.evictable_size == 3
    assert cache.evict(1) == 3 and alloc.num_free == 16  # whole nodes go


def test_lock_on_split_lower_part_keeps_upper_locked():
    alloc, cache = make(16)
    run(cache, [1, 2, 3, 4])
    deep = cache.match([1, 2, 3, 4], 4)  # locks the whole node
    shallow = cache.match([1, 2], 2)  # split: the upper part inherits deep's lock
    check_tree(cache, [deep.node, shallow.node])
    assert cache.evictable_size == 0
    cache.release(shallow.node, [1, 2], shallow.slots, 0)
    assert cache.evictable_size == 0 and cache.evict(10) == 0
    cache.release(deep.node, [1, 2, 3, 4], deep.slots, 0)
    assert cache.evictable_size == 4
    check_tree(cache)


def test_evict_least_recently_used_first_and_parents_follow():
    alloc, cache = make(32)
    run(cache, [1, 1, 1])
    run(cache, [2, 2])
    run(cache, [1, 1, 5, 5])  # splits [1, 1 | 1]; [1, 1] is now as recent as [5, 5]
    run(cache, [3])
    lookup(cache, [2, 2])  # touch [2, 2]
    # Leaves from least to most recent: [1, 1, 1], [1, 1, 5, 5], [3], [2, 2].
    assert cache.evict(1) == 1
    assert paths(cache) == [(1, 1), (1, 1, 5, 5), (2, 2), (3,)]
    # [5, 5] goes, then its parent [1, 1] (a leaf now, older than [3]) is next in line.
    assert cache.evict(1) == 2
    assert paths(cache) == [(1, 1), (2, 2), (3,)]
    assert cache.evict(1) == 2
    assert paths(cache) == [(2, 2), (3,)]
    assert cache.evict(2) == 3  # [3] then [2, 2]
    assert cache.cached_size == 0 and alloc.num_free == 32
    assert cache.evict(5) == 0 and cache.evict(0) == 0


def test_match_refreshes_lru_of_the_whole_path():
    alloc, cache = make(32)
    run(cache, [1, 2, 3])
    run(cache, [4, 5])
    lookup(cache, [1, 2, 3])
    assert cache.evict(1) == 2 and paths(cache) == [(1, 2, 3)]
    run(cache, [1, 2, 9])  # [1, 2 | 3] and [9]: [3] is older than [9]
    assert cache.evict(1) == 1 and paths(cache) == [(1, 2), (1, 2, 9)]


def test_evict_frees_at_least_requested_when_possible():
    alloc, cache = make(32)
    for t in range(5):
        run(cache, [t] * 3)
    freed = cache.evict(4)
    assert freed == 6 and cache.cached_size == 9 and alloc.num_free == 32 - 9


# ---------------------------------------------------------------- flush

def test_flush_refuses_while_locked():
    alloc, cache = make(16)
    run(cache, [1, 2, 3])
    run(cache, [4, 5])
    m = cache.match([4, 5], 2)
    assert cache.flush() is False
    assert cache.cached_size == 5 and alloc.num_free == 11
    assert paths(cache) == [(1, 2, 3), (4, 5)]  # nothing dropped
    check_tree(cache, [m.node])
    cache.release(m.node, [4, 5], m.slots, 0)
    assert cache.flush() is True
    assert cache.cached_size == cache.evictable_size == 0 and alloc.num_free == 16
    assert paths(cache) == [] and lookup(cache, [1, 2, 3]).slots == []
    assert cache.flush() is True  # empty: still fine
    run(cache, [1, 2])  # usable after a flush
    assert lookup(cache, [1, 2]).slots != [] and cache.cached_size == 2


def test_empty_match_released_after_flush():
    alloc, cache = make(8)
    run(cache, [1, 2])
    m = cache.match([3, 4], 2)  # miss: locks nothing, so flush may proceed
    own = alloc.alloc(2)
    assert cache.flush() is True
    cache.release(m.node, [3, 4], own, 2)
    assert paths(cache) == [(3, 4)] and alloc.num_free == 6
    check_tree(cache)


# ---------------------------------------------------------------- draft KV bookkeeping

def test_draft_len_recorded_and_split():
    alloc, cache = make(16)
    run(cache, [1, 2, 3, 4, 5], draft_len=3)
    m = cache.match([1, 2, 3, 4, 5], 5)
    assert m.draft_len == 3
    cache.release(m.node, [1, 2, 3, 4, 5], m.slots, 0)  # lower draft_len never lowers a mark
    m = cache.match([1, 2], 2)  # split inside the valid run: upper 2, lower 1
    assert m.draft_len == 2
    upper = m.node
    assert upper.draft_len == 2 and upper.children[3].draft_len == 1
    cache.release(m.node, [1, 2], m.slots, 0)
    m = cache.match([1, 2, 3, 4], 4)  # split the lower part again: [3, 4 | 5], upper 1, lower 0
    assert m.draft_len == 3 and m.node.draft_len == 1 and m.node.children[5].draft_len == 0
    assert [n.key for n, _ in sorted(nodes(cache), key=lambda x: len(x[1]))] == [[1, 2], [3, 4], [5]]
    cache.release(m.node, [1, 2, 3, 4], m.slots, 0)
    m = cache.match([1, 2, 3, 4, 5], 5)
    assert m.draft_len == 3
    cache.release(m.node, [1, 2, 3, 4, 5], m.slots, 5)  # the request computed the rest
    assert lookup(cache, [1, 2, 3, 4, 5]).draft_len == 5
    check_tree(cache)


def test_draft_split_past_the_valid_run():
    alloc, cache = make(16)
    run(cache, [1, 2, 3, 4, 5, 6], draft_len=2)
    m = cache.match([1, 2, 3, 4], 4)  # split at 4 > draft_len: upper 2, lower 0
    assert m.draft_len == 2 and m.node.draft_len == 2 and m.node.children[5].draft_len == 0
    check_tree(cache, [m.node])


def test_draft_len_stops_at_first_partially_valid_node():
    alloc, cache = make(32)
    run(cache, [1, 2], draft_len=2)
    run(cache, [1, 2, 3, 4], draft_len=3)  # node [3, 4] valid for 1 leading token
    # A request that missed the cache computed everything itself, draft included: its slots for
    # [1, 2, 3, 4] are duplicates (freed, no marks), its new tail [5, 6] is fully draft-valid.
    m = cache.match([1, 2, 3, 4, 5, 6], 0)
    own = alloc.alloc(6)
    cache.release(m.node, [1, 2, 3, 4, 5, 6], own, 6)
    assert cache.cached_size == 6 and alloc.num_free == 26
    assert lookup(cache, [1, 2, 3, 4, 5, 6]).draft_len == 2 + 1  # not + 2 for [5, 6]
    check_tree(cache)


def test_draft_marked_only_where_tree_slot_is_the_requests():
    alloc, cache = make(16)
    run(cache, [1, 2, 3], draft_len=0)
    m = cache.match([1, 2, 3], 0)  # missed (limit 0): computes its own copy with draft KV
    own = alloc.alloc(3)
    cache.release(m.node, [1, 2, 3], own, 3)
    assert lookup(cache, [1, 2, 3]).draft_len == 0  # its draft KV lives in freed slots
    # A request sharing the tree's slots that filled in their draft KV does raise the mark.
    m = cache.match([1, 2, 3], 3)
    cache.release(m.node, [1, 2, 3], m.slots, 2)
    assert lookup(cache, [1, 2, 3]).draft_len == 2
    check_tree(cache)


def test_draft_len_beyond_slots_is_clamped():
    alloc, cache = make(8)
    run(cache, [1, 2, 3], draft_len=10)
    assert lookup(cache, [1, 2, 3]).draft_len == 3
    check_tree(cache)


# ---------------------------------------------------------------- allocator hook and stats

def test_allocator_reclaims_from_cache():
    alloc, cache = make(10)
    run(cache, [1, 2, 3, 4])
    run(cache, [5, 6, 7, 8])
    assert alloc.num_free == 2 and alloc.num_available == 10 and alloc.can_alloc(10)
    m = cache.match([5, 6, 7, 8], 4)  # locks 4 slots
    assert alloc.num_available == 6 and alloc.can_alloc(6) and not alloc.can_alloc(7)
    assert alloc.alloc(7) is None  # refused: nothing taken, nothing evicted
    assert alloc.num_free == 2 and cache.cached_size == 8
    got = alloc.alloc(5)  # evicts the unlocked [1, 2, 3, 4]
    assert len(got) == 5 and alloc.num_free == 1 and cache.cached_size == 4
    assert paths(cache) == [(5, 6, 7, 8)]
    cache.release(m.node, [5, 6, 7, 8], m.slots, 0)
    alloc.free(got)
    check_tree(cache)


def test_allocator_without_reclaimer_unchanged():
    alloc = SlotAllocator(4)
    assert alloc.reclaimer is None and alloc.num_available == 4
    alloc.alloc(3)
    assert alloc.num_available == 1 and alloc.can_alloc(1) and not alloc.can_alloc(2)
    assert alloc.alloc(2) is None


def test_hit_statistics():
    alloc, cache = make(16)
    run(cache, [1, 2, 3, 4])  # 4 query tokens, 0 hits
    cache.release(cache.match([1, 2, 9], 3).node, [], [], 0)  # 3 query tokens, 2 hits
    cache.release(cache.match([1, 2, 3, 4, 5], 4).node, [], [], 0)  # 4 query tokens, 4 hits
    cache.release(cache.match([1], 0).node, [], [], 0)  # 0 query tokens
    assert (cache.num_queries, cache.num_query_tokens, cache.num_hit_tokens) == (4, 11, 6)


# ---------------------------------------------------------------- randomized

@pytest.mark.parametrize("seed", range(6))
def test_randomized_against_kv_model(seed):
    """Many requests over a small vocabulary (lots of sharing, splits, duplicates) under memory
    pressure.  A model of the KV pool records which token prefix each slot's target and draft KV
    really encode; every match must hand out slots whose KV is right for the query, which catches
    a locked slot that was evicted and reused, a wrong split, or a draft mark set too far."""
    rng = random.Random(seed)
    total = 96
    alloc, cache = make(total)
    target: dict[int, tuple] = {}  # slot -> token prefix its target KV encodes
    draft: dict[int, tuple] = {}  # slot -> token prefix its draft KV encodes
    bases = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    active = []  # dicts: tokens, match, slots, draft_len

    def check_match(tokens, limit, m):
        q = tokens[:max(limit, 0)]
        assert len(m.slots) <= len(q) and 0 <= m.draft_len <= len(m.slots)
        for j, s in enumerate(m.slots):
            assert target[s] == tuple(q[:j + 1])
        for j in range(m.draft_len):
            assert draft.get(m.slots[j]) == tuple(q[:j + 1])
        # Longest: the next token is not cached under this prefix (independent tree walk).
        cached = {tuple(before + n.key[:i + 1]) for n, before in nodes(cache) for i in range(len(n.key))}
        assert len(m.slots) == len(q) or tuple(q[:len(m.slots) + 1]) not in cached

    def compute(req, start):
        """The request computes target KV for slots[start:], and draft KV up to a random point."""
        toks, slots = req["tokens"], req["slots"]
        for j in range(start, len(slots)):
            target[slots[j]] = tuple(toks[:j + 1])
            draft.pop(slots[j], None)  # a reused slot: the previous owner's draft KV is stale
        dl = rng.randrange(req["draft_len"], len(slots) + 1)
        for j in range(req["draft_len"], dl):
            draft[slots[j]] = tuple(toks[:j + 1])
        req["draft_len"] = dl

    def release(req):
        m, toks, slots = req["match"], req["tokens"], req["slots"]
        for j, s in enumerate(slots):  # nobody overwrote this request's KV while it ran
            assert target[s] == tuple(toks[:j + 1])
        keep = len(slots)
        if rng.random() < 0.2 and len(slots) > len(m.slots):  # retracted: drop own tail itself
            keep = rng.randrange(len(m.slots), len(slots))
            alloc.free(slots[keep:])
        # Usually all its valid draft KV; sometimes less (never more: that would be a lie).
        dl = min(req["draft_len"], keep)
        if rng.random() < 0.2:
            dl = rng.randrange(0, dl + 1)
        cache.release(m.node, toks, slots[:keep], dl)
        active.remove(req)

    for _ in range(600):
        op = rng.random()
        if op < 0.45:  # admit a request
            toks = rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
            limit = rng.choice([len(toks), len(toks), len(toks) - 1, rng.randrange(-1, len(toks) + 1)])
            m = cache.match(toks, limit)
            check_match(toks, limit, m)
            own = alloc.alloc(len(toks) - len(m.slots))
            req = dict(tokens=toks, match=m, slots=list(m.slots), draft_len=m.draft_len)
            active.append(req)
            if own is None:  # no room: give the match back untouched
                release(req)
                continue
            req["slots"] += own
            compute(req, len(m.slots))
        elif op < 0.65 and active:  # decode a few tokens
            req = rng.choice(active)
            k = rng.randrange(1, 4)
            own = alloc.alloc(k)
            if own is None:
                release(req)
                continue
            req["tokens"] = req["tokens"] + [rng.randrange(3) for _ in range(k)]
            start = len(req["slots"])
            req["slots"] += own
            compute(req, start)
        elif op < 0.9 and active:
            release(rng.choice(active))
        elif op < 0.97:
            before_free, before_evictable = alloc.num_free, cache.evictable_size
            n = rng.randrange(0, 20)
            freed = cache.evict(n)
            assert freed >= min(n, before_evictable) and freed <= before_evictable
            assert alloc.num_free == before_free + freed
            assert cache.evictable_size == before_evictable - freed
        else:
            before = (alloc.num_free, cache.cached_size)
            any_locked = any(r["match"].node is not cache._root for r in active)
            ok = cache.flush()
            assert ok == (not any_locked)
            if ok:
                assert cache.cached_size == 0
            else:
                assert (alloc.num_free, cache.cached_size) == before

        own_total = sum(len(r["slots"]) - len(r["match"].slots) for r in active)
        assert alloc.num_free + cache.cached_size + own_total == total
        assert alloc.num_available == alloc.num_free + cache.evictable_size
        check_tree(cache, [r["match"].node for r in active])

    while active:
        release(active[0])
    check_tree(cache)
    assert alloc.num_free + cache.cached_size == total
    assert cache.evictable_size == cache.cached_size
    assert cache.flush() and alloc.num_free == total


def test_running_request_gets_slots_a_waiting_request_holds_locked():
    """A waiting request keeps its matched prefix locked; when a running request needs those
    slots the lock is dropped (the waiting one matches again at admission) instead of both
    waiting for each other."""
    from faser_sgl.managers.batch_planner import BatchPlanner
    from faser_sgl.managers.request import Request, StopConditions

    def req(rid, prompt):
        return Request(rid=rid, http_worker_ipc=None, prompt_ids=prompt,
                       stop=StopConditions(64, frozenset()), sampling=None, stream=False)

    alloc, cache = make(32)
    planner = BatchPlanner(alloc, max_running_requests=4, max_step_tokens=64, prefix_cache=cache)
    shared = list(range(100, 108))
    first = req("first", shared + [1])
    planner.add(first)
    planner.plan()
    first.output_ids.append(7)
    planner.release(first)  # its KV goes to the cache
    running = req("running", list(range(200, 220)))
    planner.add(running)
    planner.plan()
    waiting = req("waiting", shared + list(range(300, 310)))
    planner.add(waiting)
    for step in range(8):  # the running request decodes past the free slots
        running.output_ids.append(step)
        chunks = planner.plan()
        assert [c.req for c in chunks] == [running], f"step {step}: running request starved"
    assert waiting in planner.waiting
