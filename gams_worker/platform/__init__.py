"""Where the RunPod SDK is bent to our needs: job loop, cancellation, local runs, status."""
