"""Training and evaluation of the InfMap model. Never imports Streamlit."""
