"""Experiments that measure what MoM delivers: recall (MQAR), retrofit on real text, memory statistics."""
