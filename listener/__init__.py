"""order-expiry-listener: cancels unpaid orders at their deadline and announces it over MQTT."""
