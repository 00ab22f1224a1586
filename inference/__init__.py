"""Inference: from a chest X-ray file to a prediction. Never imports Streamlit or the database."""
