"""A RunPod serverless worker serving the Slovene LLM GaMS with vLLM."""
