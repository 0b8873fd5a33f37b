"""The web page (Gradio): ask a model, compare two side by side, train from an uploaded file, export.

scripts/webui.py starts it; app.py lays it out on the library's own settings and models.
"""
