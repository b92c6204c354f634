"""A cached property that torch.compile traces."""


def cached_property(fn):
    """functools.cached_property without its lock (Python 3.11's takes an RLock, which torch.compile cannot
    enter: a graph break at every first read). Computed once per instance, kept in its ``__dict__``."""
    key = f'_cached_{fn.__name__}'

    def get(self):
        cache = self.__dict__
        if key not in cache:
            cache[key] = fn(self)
        return cache[key]
    return property(get, doc=fn.__doc__)
