"""codecstream server: speech to codec tokens and back over WebSocket, voice-call rooms.

Depends on `streaming` (the torch-free engine) and the web stack only; never on `models`.
"""
