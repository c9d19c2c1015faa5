"""Radix-tree prefix cache over KV slots (page size 1).

When a request is done with its KV, its token sequence and the slots holding that KV go into a
radix tree instead of back to the allocator.  A later request that starts with the same tokens
matches the longest cached prefix and reuses those slots, skipping their prefill.

Each node holds a run of tokens and their slots; children are keyed by the first token of their
run.  A match locks the path from its last node up to the root (``lock_ref``) so that eviction,
which frees unlocked leaves least recently used first, cannot take KV that a running request reads.
``lock_ref`` of a node is the number of live matches ending at it or below it.

Target and draft models share slot numbering, but a slot's draft KV may be missing (the draft lags
the target), so each node also records how many of its leading tokens have valid draft KV.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from faser_sgl.executor.kv_cache import SlotAllocator


class _Node:
    __slots__ = ("key", "slots", "parent", "children", "draft_len", "lock_ref", "last_access")

    def __init__(self, key: list[int], slots: list[int], parent: "_Node | None", last_access: int = 0):
        self.key = key
        self.slots = slots
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.draft_len = 0  # leading tokens of this node whose draft-model KV is valid
        self.lock_ref = 0
        self.last_access = last_access


@dataclass
class PrefixMatch:
    slots: list[int]  # slots of the matched prefix, owned by the cache
    draft_len: int  # leading matched tokens whose draft-model KV is valid
    node: object  # opaque handle, locked until PrefixCache.release()


def _common_len(a: list[int], b: list[int], start: int) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, allocator: SlotAllocator):
        self.allocator = allocator
        allocator.reclaimer = self
        self._root = _Node([], [], None)
        self._clock = 0  # logical time for LRU: a counter, so ties and order are deterministic
        self._cached = 0
        self._evictable = 0
        self.num_queries = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def evictable_size(self) -> int:
        """Slots in unlocked nodes: what evict() could free."""
        return self._evictable

    @property
    def cached_size(self) -> int:
        """All slots held by the tree, locked or not."""
        return self._cached

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match(self, tokens: list[int], limit: int) -> PrefixMatch:
        """Longest cached prefix of tokens[:limit]; locks it until release() and marks it used."""
        tokens = tokens[:max(limit, 0)]
        self.num_queries += 1
        self.num_query_tokens += len(tokens)
        now = self._tick()
        node, pos, slots = self._root, 0, []
        draft_len, draft_contiguous = 0, True
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            m = _common_len(child.key, tokens, pos)
            if m < len(child.key):
                # The lock must sit on a node boundary, so the matched part becomes its own node.
                child = self._split(child, m)
            slots.extend(child.slots)
            # Draft KV at a position is only usable if every earlier position has it too.
            if draft_contiguous:
                draft_len += child.draft_len
                draft_contiguous = child.draft_len == len(child.key)
            child.last_access = now
            node, pos = child, pos + m
        self._lock(node)
        self.num_hit_tokens += len(slots)
        return PrefixMatch(slots=slots, draft_len=draft_len, node=node)

    def matched_len(self, tokens: list[int], limit: int) -> int:
        """How many of tokens[:limit] are cached, without locking, splitting or counting a
        query (the longest-prefix-match order of the waiting queue, --schedule-policy lpm)."""
        tokens = tokens[:max(limit, 0)]
        node, pos = self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            m = _common_len(child.key, tokens, pos)
            pos += m
            if m < len(child.key):
                break
            node = child
        return pos

    def release(self, match_node, tokens: list[int], slots: list[int], draft_len: int) -> None:
        """Take over a finished request's KV: insert tokens[:len(slots)] with their slots, free
        the request's slots for positions the tree already holds under another slot, mark draft
        KV valid below draft_len where the tree's slot is the request's own, then unlock the node
        match() locked."""
        if len(slots) > len(tokens):
            raise ValueError(f"{len(slots)} slots for only {len(tokens)} tokens")
        if match_node is not self._root and match_node.lock_ref <= 0:
            raise RuntimeError("release() of a match that is not locked (released twice?)")
        n = len(slots)
        tokens = tokens[:n]
        now = self._tick()
        duplicates: list[int] = []
        node, pos = self._root, 0
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                new = _Node(list(tokens[pos:n]), list(slots[pos:n]), node, now)
                new.draft_len = min(max(draft_len - pos, 0), n - pos)
                node.children[tokens[pos]] = new
                self._cached += n - pos
                self._evictable += n - pos
                break
            m = _common_len(child.key, tokens, pos)
            if m < len(child.key) and pos + m < n:
                # The sequences diverge inside this node: split so the rest can hang below it.
                # (When the request's tokens simply end inside it, no split is needed.)
                child = self._split(child, m)
            # Another request may have inserted the same text with its own slots meanwhile: the
            # tree keeps its copy and ours is freed.  Equal slots are the ones shared by match().
            valid = 0  # leading run of this node where the request's draft KV lives in the slot
            for j in range(m):
                same = child.slots[j] == slots[pos + j]
                if not same:
                    duplicates.append(slots[pos + j])
                if valid == j and same and pos + j < draft_len:
                    valid += 1
            child.draft_len = max(child.draft_len, valid)
            child.last_access = now
            node, pos = child, pos + m
        if duplicates:
            self.allocator.free(duplicates)
        self._unlock(match_node)

    def evict(self, num_slots: int) -> int:
        """Free at least num_slots slots (if that many are unlocked) from unlocked leaves, least
        recently used first.  Returns how many slots were freed."""
        if num_slots <= 0:
            return 0
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_slots:
            _, _, leaf = heapq.heappop(heap)
            freed.extend(leaf.slots)
            self._cached -= len(leaf.slots)
            self._evictable -= len(leaf.slots)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            # A parent left without children is now a leaf, and may be just as stale.
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if freed:
            self.allocator.free(freed)
        return len(freed)

    def flush(self) -> bool:
        """Drop every cached prefix and free its slots, unless some match is still locked."""
        # A lock raises lock_ref on every node up to the root, so checking the top level suffices.
        if any(child.lock_ref for child in self._root.children.values()):
            return False
        freed = [s for node in self._nodes() for s in node.slots]
        # Keep the root object: empty matches (node=root) handed out before may still be released.
        self._root.children = {}
        self._cached = self._evictable = 0
        if freed:
            self.allocator.free(freed)
        return True

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut node after its first m tokens; return the new upper part.  The original object
        stays the lower part, so match handles pointing at it stay valid (and still see the upper
        part on their way to the root)."""
        upper = _Node(node.key[:m], node.slots[:m], node.parent, node.last_access)
        # Every lock on node also covers its ancestors, so the upper part inherits them all.
        upper.lock_ref = node.lock_ref
        upper.draft_len = min(node.draft_len, m)
        upper.children[node.key[m]] = node
        node.parent.children[node.key[0]] = upper
        node.key, node.slots = node.key[m:], node.slots[m:]
        node.draft_len = max(0, node.draft_len - m)
        node.parent = upper
        return upper

    def _lock(self, node: _Node) -> None:
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
            node.lock_ref += 1
            node = node.parent

    def _unlock(self, node: _Node) -> None:
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
            node = node.parent

    def _nodes(self):
        """Every node except the root."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _leaves(self):
        return (node for node in self._nodes() if not node.children)
