"""Everything that talks to Redis: key names (:mod:`.keys`), Lua scripts (``lua/``) and
the sync and asyncio clients (:mod:`.redis`)."""
