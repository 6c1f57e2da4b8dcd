"""Cryptography: compact JWE (dir + A256GCM), key wrapping, tokens and passcodes."""
