"""Leaf integrations (LangChain). The core never imports these; nothing is imported here."""
