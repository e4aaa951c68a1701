"""Streamlit view helpers shared by app.py and app_pages/ (the only place besides them that imports streamlit)."""
