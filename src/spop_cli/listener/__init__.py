"""Listeners: the asyncio core and the four vendor-shaped blocking classes."""
