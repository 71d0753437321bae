"""A small MCP server (stdio) for the framework integration tests: its tools append to the ledger file they
are given, so a test counts how often the agent really called them."""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("dex-test-tools")


@server.tool()
def record_visit(ledger: str, city: str) -> str:
    """Record a visit to a city in the travel log."""
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"mcp record_visit {city}\n".encode())
    finally:
        os.close(fd)
    return f"visit to {city} recorded"


if __name__ == "__main__":
    server.run("stdio")
