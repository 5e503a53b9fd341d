"""End-of-run evaluation: FedAvg baseline, personalisation, image quality (FID/KID)."""
