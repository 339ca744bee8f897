"""A chart series that stays under a fixed size however long a run goes (no Qt here).

A run can log a million steps and sample the GPU twice a second for days; the window needs
only what it draws. :class:`BoundedSeries` keeps:

* the newest ``exact`` points as they came (the end of a live curve is never approximated);
* everything older in at most ``buckets`` buckets of equal width (in points), each reduced
  to its first, lowest, highest and last point (M4 aggregation: a line drawn through these
  covers the same pixels as one through every point of the bucket, so the peaks, the
  minimum and the whole x range stay on the chart). When the buckets run out, neighbours
  merge pairwise and the width doubles: old points lose resolution, the memory does not grow.

Nothing is lost while a bucket holds four points or fewer, so a series is exact below
``4 * buckets + exact`` points (4,608 with the defaults) and never larger than that afterwards.
The full record of a run stays on disk, in its ``events.jsonl``.
"""

from __future__ import annotations

from collections import deque

Point = tuple[float, float]


def m4(points: list[Point]) -> list[Point]:
    """First, lowest, highest and last of ``points`` (sorted by x), in x order, without repeats."""
    n = len(points)
    if n <= 4:
        return points
    lo = hi = 0
    for i in range(1, n):  # a plain loop: this runs for most appended points of a long run
        y = points[i][1]
        if y < points[lo][1]:
            lo = i
        elif y > points[hi][1]:
            hi = i
    return [points[i] for i in sorted({0, lo, hi, n - 1})]


class BoundedSeries:
    """(x, y) points appended in increasing x; at most ``4 * buckets + exact`` of them are kept."""

    def __init__(self, buckets: int = 1024, exact: int = 512) -> None:
        if buckets < 2 or exact < 1:
            raise ValueError(f"buckets must be at least 2 and exact at least 1, not {buckets} and {exact}")
        self.max_buckets = buckets
        self.exact = exact
        self.width = 1
        """Raw points per closed bucket (doubles at every merge)."""
        self._closed: list[list[Point]] = []
        self._open: list[Point] = []
        """The bucket being filled, already reduced to at most four points."""
        self._open_count = 0
        self._tail: deque[Point] = deque()
        self._cache: tuple[list[float], list[float]] | None = None

    def __len__(self) -> int:
        """Points kept (and drawn)."""
        return sum(len(b) for b in self._closed) + len(self._open) + len(self._tail)

    def __bool__(self) -> bool:
        return bool(self._tail or self._open or self._closed)

    @property
    def last(self) -> Point | None:
        if self._tail:
            return self._tail[-1]
        if self._open:
            return self._open[-1]
        return self._closed[-1][-1] if self._closed else None

    def append(self, x: float, y: float) -> None:
        self._tail.append((float(x), float(y)))
        self._cache = None
        if len(self._tail) > self.exact:
            self._retire(self._tail.popleft())

    def _retire(self, p: Point) -> None:
        """Move the oldest exact point into the open bucket; close that once it is full."""
        self._open.append(p)
        if len(self._open) > 4:
            self._open = m4(self._open)
        self._open_count += 1
        if self._open_count < self.width:
            return
        self._closed.append(self._open)
        self._open, self._open_count = [], 0
        if len(self._closed) >= self.max_buckets:
            merged = [m4(a + b) for a, b in zip(self._closed[0::2], self._closed[1::2], strict=False)]
            if len(self._closed) % 2:
                merged.append(self._closed[-1])
            self._closed = merged
            self.width *= 2

    def _set_open(self, points: list[Point]) -> None:
        """Make ``points`` (x order) the open bucket, as if they had been retired one by one."""
        self._open = m4(points)
        self._open_count = len(points)

    def drop_after(self, x: float) -> None:
        """Forget the points with an x above ``x`` (a run resumed from an earlier checkpoint)."""
        last = self.last
        if last is not None and last[0] > x:
            self._drop(lambda p: p[0] <= x)

    def drop_from(self, x: float) -> None:
        """Forget the points with an x of ``x`` or above (a step logged again replaces the old one)."""
        last = self.last
        if last is not None and last[0] >= x:
            self._drop(lambda p: p[0] < x)

    def _drop(self, keep) -> None:
        self._cache = None
        while self._tail and not keep(self._tail[-1]):
            self._tail.pop()
        if self._tail:
            return
        # Rare: the cut reaches past the exact tail into the buckets. A trimmed bucket becomes
        # the open one again and counts only the points it kept, so it takes a few more.
        if self._open and not keep(self._open[-1]):
            self._set_open([p for p in self._open if keep(p)])
        while not self._open and self._closed and not keep(self._closed[-1][-1]):
            self._set_open([p for p in self._closed.pop() if keep(p)])

    def data(self) -> tuple[list[float], list[float]]:
        """(xs, ys) of the kept points, oldest first (shared lists: do not change them)."""
        if self._cache is None:
            pts = [p for b in self._closed for p in b] + self._open + list(self._tail)
            self._cache = ([p[0] for p in pts], [p[1] for p in pts])
        return self._cache
