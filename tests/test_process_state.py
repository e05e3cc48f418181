"""What a prefork child does with what it inherited from the worker's main process."""

from __future__ import annotations

import gc

from tasks.signals import after_child_fork


def test_a_forked_child_freezes_what_it_inherited_out_of_the_collectors_walks():
    gc.unfreeze()
    try:
        inherited = len(gc.get_objects())
        after_child_fork()
        assert gc.get_freeze_count() >= inherited * 0.9  # the imports, frozen: a full collection skips them
        assert len(gc.get_objects()) < inherited * 0.1
    finally:
        gc.unfreeze()
