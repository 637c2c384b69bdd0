"""Conversations as the model was trained on them, for every engine (scheduler thread): the chat
template (the model's own, a file, or a built-in), rendered in a Jinja2 sandbox; trimming a
conversation to the context; the model's tool calls taken out of its text."""
