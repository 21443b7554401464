"""The hub: accepts pops and contact events, routes pops to listeners, journals them."""
