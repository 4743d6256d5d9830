"""Where the RunPod SDK is bent to our needs: job loop, result posts, local runs, status."""
