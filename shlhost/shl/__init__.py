"""The SMART Health Links protocol, free of Flask: payloads, tickets and the links service."""
